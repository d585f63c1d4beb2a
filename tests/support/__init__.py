"""Test infrastructure: real DICOM peers (dcmtk storescp/storescu, Orthanc) on free loopback
ports, dicom3tools' dciodvfy, and the CI rule for missing tools.

Later issues use these through the fixtures in ``tests/conftest.py``.
"""
