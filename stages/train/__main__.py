"""`python -m stages.train --config C`: the same as `pgraft train`."""

import sys

from pgraft.cli import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("train"))
