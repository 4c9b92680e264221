"""Experiments on the Unified Mamba–Hopfield–DEQ model (seed `mamba_hopfield_deq.md`, "Experiments").

`ConvergenceValidator` (theory: contraction, convergence rate, uniqueness), `EnergyLandscapeAnalyzer` (PNG plots,
matplotlib imported lazily), `AssociativeRecallExperiment` and `ContinualLearningExperiment` (memory tasks).
"""

from training.experiments.convergence import ConvergenceReport, ConvergenceValidator
from training.experiments.energy import EnergyLandscapeAnalyzer
from training.experiments.memory_tasks import (
    AssociativeRecallExperiment,
    ContinualLearningExperiment,
    ContinualLearningResult,
    RecallResult,
)

__all__ = ["AssociativeRecallExperiment", "ContinualLearningExperiment", "ContinualLearningResult",
           "ConvergenceReport", "ConvergenceValidator", "EnergyLandscapeAnalyzer", "RecallResult"]
