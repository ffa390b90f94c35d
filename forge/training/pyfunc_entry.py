"""The code file of every Forge MLflow model (MLflow's models from code).

MLflow copies this file into the model and runs it when the model loads; it names the
model's class and holds nothing else, so the model carries no pickled object. The
class lives in ``forge.training.pyfunc``: Forge must be importable where a model loads.
"""

import mlflow

from forge.training.pyfunc import ForgeModel

mlflow.models.set_model(ForgeModel())
