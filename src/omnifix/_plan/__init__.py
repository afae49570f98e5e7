"""The placement planner: where each module goes, and whether the workload fits, before loading.

Data flows one way: what the user names (preset, checkpoint, config, model) becomes a skeleton
on ``meta`` (:mod:`.skeleton`, :mod:`.presets`); its anatomy (:mod:`.anatomy`) and the workload
(:mod:`.workload`) give each device's predicted peak under a map (:mod:`.estimate`) against its
budget (:mod:`.budgets`); the strategies (:mod:`.strategies`) pick one GPU, a split or an
offload, and a refusal lists the changes that would fit (:mod:`.options`). :mod:`.plan` holds
the entry point and the answer. The memory model is explained in docs/loading.md.
"""

from omnifix._plan.budgets import DeviceBudget
from omnifix._plan.plan import AttnImplementation, PlacementPlan, plan_placement
from omnifix._plan.strategies import Strategy
from omnifix._plan.workload import Workload, require_workload

__all__ = [
    "AttnImplementation",
    "DeviceBudget",
    "PlacementPlan",
    "Strategy",
    "Workload",
    "plan_placement",
    "require_workload",
]
