"""The placement planner: where each module goes, and whether the workload fits, before loading.

Data flows one way: what the user names becomes a skeleton on ``meta`` (``presets``,
``skeleton``); its ``anatomy`` and the ``workload`` give each device's peak under a map
(``estimate``) against its ``budgets``; the ``strategies`` pick one GPU, a split or an offload, a
refusal lists the ``options`` that would fit, and ``plan`` holds the entry point and the answer;
``parallel`` plans tensor x pipeline layouts over several GPUs and hosts, and ``engines`` writes
the command lines that start them.
"""

from omnifix._plan.budgets import DeviceBudget
from omnifix._plan.engines import EngineLaunch
from omnifix._plan.options import PlanOption
from omnifix._plan.parallel import ParallelLayout
from omnifix._plan.plan import AttnImplementation, PlacementPlan, plan_placement
from omnifix._plan.strategies import Strategy
from omnifix._plan.workload import Workload, require_workload

__all__ = [
    "AttnImplementation",
    "DeviceBudget",
    "EngineLaunch",
    "ParallelLayout",
    "PlacementPlan",
    "PlanOption",
    "Strategy",
    "Workload",
    "plan_placement",
    "require_workload",
]
