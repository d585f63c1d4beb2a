"""vcemri: the command-line entry point and the version of the distribution.

The product lives in the packages ``config``, ``dicom_node``, ``synthesis``, ``planning`` and
``training``; this package only wires their commands into one ``vcemri`` program.
"""

__version__ = "0.1.0"
