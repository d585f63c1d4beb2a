"""Everything written for the treatment planning system: the synthetic CE-MRI series, RTSTRUCT
helper contours and review images. Imports ``config`` and ``synthesis`` types only.

Nothing here yet: the planning outputs issue fills this package.
"""
