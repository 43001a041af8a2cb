"""A debugging aid for hangs across processes: with this folder on PYTHONPATH and STACKS_EVERY_S set,
every Python process (spawned tensor-parallel and batch workers included, since they inherit the
environment) prints all its threads' stacks to stderr every STACKS_EVERY_S seconds.

    PYTHONPATH=.:scripts/debug_site STACKS_EVERY_S=60 python bench.py ...
"""
import faulthandler
import os

if os.environ.get("STACKS_EVERY_S"):
    faulthandler.dump_traceback_later(float(os.environ["STACKS_EVERY_S"]), repeat=True)

# This file shadows any sitecustomize of the interpreter's own: run that one too.
_here = os.path.dirname(os.path.abspath(__file__))
for _entry in __import__("sys").path:
    _candidate = os.path.join(os.path.abspath(_entry or "."), "sitecustomize.py")
    if os.path.dirname(_candidate) != _here and os.path.isfile(_candidate):
        with open(_candidate) as _file:
            exec(compile(_file.read(), _candidate, "exec"), {"__name__": "sitecustomize", "__file__": _candidate})
        break
