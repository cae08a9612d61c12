import sys

from trainmetrics.cli import main

sys.exit(main())
