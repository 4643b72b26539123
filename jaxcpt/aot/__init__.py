"""Ahead-of-time compilation for accelerators this host does not have (``jaxcpt compile``).

topology.py names TPU slices and gets their devices from libtpu, memory.py turns XLA's
memory analysis into a per-chip report, architectures.py names the public models our
configs start from, explore.py compiles every remat policy (``--explore``), shipped.py lists
the shipped configs with the slice each must fit, command.py is the command.
"""
