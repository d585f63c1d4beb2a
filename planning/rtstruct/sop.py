"""The RT Structure Set object (PS3.3 A.19) on highdicom's ``SOPClass``."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage

from .content import (
    Contour,
    ReferencedFrameOfReference,
    Region,
    ROIContour,
    RTROIObservation,
    StructureSetROI,
    mask_outlines,
    to_patient,
)


class RTStructureSet(hd.SOPClass):
    """Closed planar contours of ``regions`` drawn on ``images`` (one series, ascending along
    the slice normal, each region's mask on that grid), in the images' patient, study and
    frame of reference. Unapproved: a TPS shows them as proposals."""

    def __init__(
        self,
        images: Sequence[Dataset],
        regions: Sequence[Region],
        *,
        series_instance_uid: str,
        series_number: int,
        sop_instance_uid: str,
        label: str,
        name: str,
        description: str,
        series_description: str,
        manufacturer: str,
        manufacturer_model_name: str,
        software_versions: str,
        roi_description: str = "",
        created: _dt.datetime | None = None,
    ) -> None:
        if not images:
            raise ValueError("a structure set is drawn on at least one image")
        first = images[0]
        for region in regions:
            if region.mask.shape[0] != len(images):
                raise ValueError(f"region {region.name}: {region.mask.shape[0]} mask slices "
                                 f"for {len(images)} images")
        super().__init__(
            study_instance_uid=str(first.StudyInstanceUID),
            series_instance_uid=series_instance_uid, series_number=series_number,
            sop_instance_uid=sop_instance_uid, sop_class_uid=RTStructureSetStorage,
            instance_number=1, modality="RTSTRUCT", manufacturer=manufacturer,
            transfer_syntax_uid=ExplicitVRLittleEndian, series_description=series_description,
            manufacturer_model_name=manufacturer_model_name,
            software_versions=software_versions,
            specific_character_set=first.get("SpecificCharacterSet", "ISO_IR 100"))
        self.copy_patient_and_study_information(first)
        moment = created or _dt.datetime.now()
        date, time = moment.strftime("%Y%m%d"), moment.strftime("%H%M%S")
        self.InstanceCreationDate, self.InstanceCreationTime = date, time
        self.SeriesDate, self.SeriesTime = date, time
        self.OperatorsName = ""
        self.FrameOfReferenceUID = first.FrameOfReferenceUID
        self.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
        self.StructureSetLabel = label[:16]
        self.StructureSetName = name[:64]
        self.StructureSetDescription = description[:1024]
        self.StructureSetDate, self.StructureSetTime = date, time
        self.ReferencedFrameOfReferenceSequence = [ReferencedFrameOfReference(images)]
        rois, contours, observations = [], [], []
        for number, region in enumerate(regions, start=1):
            rois.append(StructureSetROI(number, region.name, str(first.FrameOfReferenceUID),
                                        description=roi_description))
            drawn = [Contour(to_patient(polygon, image), image)
                     for k, image in enumerate(images) if region.mask[k].any()
                     for polygon in mask_outlines(region.mask[k])]
            contours.append(ROIContour(number, region.colour, drawn))
            observations.append(RTROIObservation(number, number, region.interpreted_type))
        self.StructureSetROISequence = rois
        self.ROIContourSequence = contours
        self.RTROIObservationsSequence = observations
        self.ApprovalStatus = "UNAPPROVED"
