import sys

from trainmetrics.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
