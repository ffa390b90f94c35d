"""Generated documents: JSON Schema per event, the AsyncAPI description and the
configuration reference, each made from the code so that none can fall behind."""
