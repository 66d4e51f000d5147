"""What a protection method's ``run(job, config)`` receives: the model, the domains, which of them
are authorized and unauthorized, the scenario, and the run folder its artifacts go to.

A ``Job`` is built by the jobs layer (``ipshield.jobs``), which also writes ``config.yaml``,
``metrics.json`` and ``run.json``; a method only trains, evaluates, saves its artifacts into
``job.out`` (when set) and returns its metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # typing only: the data layer sits above this module
    from ipshield.data.domain import Domain


@dataclass
class Job:
    #: the model to protect: a CLIP adapter (``MethodSpec.model == "clip"``) or a ``Classifier``
    model: Any
    #: every domain of the run, by name (evaluation covers all of them)
    domains: dict[str, "Domain"]
    authorized: str
    #: the unauthorized domains the method may train against (empty in target-free and ownership)
    unauthorized: list[str] = field(default_factory=list)
    scenario: str | None = None
    #: the run folder (artifacts only; None: nothing is saved)
    out: Path | None = None
    verbose: bool = True
    #: extras a caller can hand a method: a trained CoOp reference ("coop"), whether to train one
    #: ("with_coop"), its config ("coop_config"), MAP's pseudo-source ("pseudo_source"), ...
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def authorized_domain(self) -> "Domain":
        return self.domains[self.authorized]

    @property
    def unauthorized_domains(self) -> list["Domain"]:
        return [self.domains[u] for u in self.unauthorized]

    def other_domains(self) -> list[str]:
        return [d for d in self.domains if d != self.authorized and d not in self.unauthorized]
