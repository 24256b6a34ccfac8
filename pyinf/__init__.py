"""pyinf: training-data influence for LoRA-tuned models, on one fast engine.

    scores = pyinf.influence(train_grads, query_grads, method="datainf")   # (m, n)

Score convention (every method): score[j, i] = −v_jᵀ H⁻¹ g_i, positive means
training point i is harmful to query j, negative means helpful.
"""
from .api import influence, self_influence
from .attributor import Attributor
from .capture import per_sample_grads
from .forward import forward_influence
from .gradients import TrainGradients, capture_gradients
from .losses import Task
from .methods import METHODS

__version__ = "0.1.0"

__all__ = ["influence", "self_influence", "Attributor", "capture_gradients", "TrainGradients", "Task",
           "per_sample_grads", "forward_influence", "METHODS", "__version__"]
