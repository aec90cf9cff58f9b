"""A discrete-event simulator of the serving cluster: virtual time, the real policy classes.

``costs`` (GPU cost models from measured tables), ``engine`` (broker + workers in virtual time),
``workloads`` (arrival patterns), ``metrics`` (what a run reports), ``runs`` (the comparison and the
validation against the seed's tables). ``scripts/simulate.py`` is the command line.
"""
