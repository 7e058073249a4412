"""tests/e2e is importable by name for its helper modules."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
