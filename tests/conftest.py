# Light on purpose: heavy libraries are imported inside tests and fixtures, never here.
from pipeline.env import apply_defaults

apply_defaults()
