import sys

from stages.filter import main

sys.exit(main())
