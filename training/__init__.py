"""Simulated cohorts, datasets, registration, mixture modelling, the trainer (DDP), evaluation
tables, figures and reports. Imports ``config`` and ``synthesis``.

Nothing here yet: the simulator and training issues fill this package.
"""
