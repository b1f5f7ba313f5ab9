"""Units of work and the plain workers that do them, free of Ray.

A worker is a callable class: `__init__(*args)` loads what it needs once (a model, a reward,
the run's storage), `__call__(unit)` does one unit and returns a small result. The cluster
layer (`cluster.execute`) starts one per actor from a `WorkerSpec`, sets the actor's torch
threads before building it, skips committed units and feeds it the rest; a test can build
one directly and call it on a unit. Each module here also holds its stage's planning and
tally (the `*Job` classes), so that stages drive them and never import each other.
"""

from pgraft.work.spec import Finished, WorkerSpec

__all__ = ["Finished", "WorkerSpec"]
