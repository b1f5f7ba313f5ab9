"""Filter stage (docs/DESIGN.md §3): `stage` runs a selection; `inputs` reads and checks the
reward parts; `partition` selects over whole prompts; `local` and `ray_engine` are the two
engines; `output` writes the accepted parts."""

from stages.filter.errors import FilterError
from pgraft.tables import read_accepted
from pgraft.tables import read_selection_summary as read_summary
from stages.filter.stage import STAGE, FilterSummary, main, run_filter

__all__ = ["STAGE", "FilterError", "FilterSummary", "main", "read_accepted", "read_summary", "run_filter"]
