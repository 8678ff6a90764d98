"""Face detection: MTCNN (P-, R-, O-Net) with the published weights, and the choice of faces in photos."""
from .mtcnn import MTCNN, Face, pyramid_scales, regress_boxes, square_boxes
from .nets import load_nets, weights_paths
from .photos import (
                     FACE_RULES,
                     DetectSettings,
                     PhotoFaces,
                     choose_faces,
                     detect_landmarks,
                     detect_photos,
                     read_photo,
)

__all__ = [
    "FACE_RULES",
    "MTCNN",
    "DetectSettings",
    "Face",
    "PhotoFaces",
    "choose_faces",
    "detect_landmarks",
    "detect_photos",
    "load_nets",
    "pyramid_scales",
    "read_photo",
    "regress_boxes",
    "square_boxes",
    "weights_paths",
]
