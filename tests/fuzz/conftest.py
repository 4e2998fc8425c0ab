import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # cases.py and fuzz.py are scripts, not a package
