"""Network edge and orchestration: C-STORE SCP, spool, series assembly, routing, job queue,
sender, and the ``serve`` and ``demo`` commands. Imports ``config``, ``synthesis`` and
``planning``.

Nothing here yet: the DICOM node issue fills this package.
"""
