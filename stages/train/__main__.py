"""`python -m stages.train --config C`: the same as `pgraft train`."""

import sys

from stages.train import main

if __name__ == "__main__":
    sys.exit(main())
