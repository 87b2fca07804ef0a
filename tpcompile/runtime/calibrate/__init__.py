"""``tprun calibrate``: measure this host for the cost model and write it as hardware profiles
(``format/hardware.py``): ``measure.py`` (what one rank measures), ``command.py`` (spawning, the profiles)."""
