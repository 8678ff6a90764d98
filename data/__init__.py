"""Face datasets: native RecordIO, image folders, packing and alignment, verification sets, synthesis."""
from .align import ARCFACE_TEMPLATE, align_face, similarity_transform
from .bins import load_bin, write_bin
from .datasets import FaceFolderDataset, FaceRecordDataset
from .errors import DataError
from .images import decode_image, encode_image, to_tensor
from .loader import build_loader
from .pack import pack_folder
from .synth import generate_synthetic, synthetic_set_differences
from .verification_sets import make_bin_cfp, make_bin_lfw

__all__ = [
    "ARCFACE_TEMPLATE",
    "DataError",
    "FaceFolderDataset",
    "FaceRecordDataset",
    "align_face",
    "build_loader",
    "decode_image",
    "encode_image",
    "generate_synthetic",
    "load_bin",
    "make_bin_cfp",
    "make_bin_lfw",
    "pack_folder",
    "similarity_transform",
    "synthetic_set_differences",
    "to_tensor",
    "write_bin",
]
