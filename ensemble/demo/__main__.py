import sys

from ensemble.cli import app

app(["demo", *sys.argv[1:]])
