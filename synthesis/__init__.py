"""DICOM series to volumes, preprocessing, institution classification, EDM, fitness screening,
models (MMgSN-Net and baselines), checkpoints and inference. Imports ``config`` only.

Nothing here yet: the synthesis engine issue fills this package.
"""
