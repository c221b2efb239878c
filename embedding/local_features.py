"""Local features and geometric verification: do two images show the same picture, however much
one was cropped, rotated, recoloured or recompressed?

A global embedding blurs a heavily cropped copy into "a similar scene"; local features do not.
SIFT keypoints (OpenCV) of both images are matched with Lowe's ratio test, and RANSAC fits a
similarity transform (rotation, scale, translation: what crops, turns and resizes do) to the
matches. The number of matches that agree with it, the inliers, says whether the two are one
picture: unrelated images rarely have more than a handful by chance.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from embedding.decode import decode_image

# Longer side the features are taken at: enough detail for SIFT, a fraction of a full decode's cost.
MAX_SIDE = 384
MAX_FEATURES = 500
RATIO = 0.75            # Lowe's ratio test: best match clearly better than the second best
REPROJECTION_PX = 6.0   # RANSAC: a match within this many pixels of the fitted transform is an inlier

cv2.setNumThreads(1)  # callers run several verifications in threads of their own


@dataclass
class Features:
    """Keypoint positions (n, 2) and SIFT descriptors (n, 128) of one image."""

    points: np.ndarray
    descriptors: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.points.nbytes + self.descriptors.nbytes


def extract(rgb: np.ndarray, max_features: int = MAX_FEATURES) -> Features:
    """SIFT features of an HxWx3 uint8 image, scaled so its longer side is at most MAX_SIDE."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    scale = MAX_SIDE / max(gray.shape)
    if scale < 1:
        gray = cv2.resize(gray, (round(gray.shape[1] * scale), round(gray.shape[0] * scale)),
                          interpolation=cv2.INTER_AREA)
    keypoints, descriptors = cv2.SIFT_create(nfeatures=max_features).detectAndCompute(gray, None)
    if descriptors is None:
        return Features(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32))
    return Features(np.float32([k.pt for k in keypoints]), descriptors)


def features_of(data: bytes, *, max_bytes: int, max_pixels: int) -> Features:
    """Features of image bytes, decoded with the upload limits (raises ImageDecodeError)."""
    img = decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels, draft=MAX_SIDE)
    return extract(np.asarray(img))


def inliers(a: Features, b: Features) -> int:
    """Matches between a and b that one similarity transform explains (0 when too few match)."""
    if len(a.descriptors) < 2 or len(b.descriptors) < 2:
        return 0
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(a.descriptors, b.descriptors, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < RATIO * p[1].distance]
    if len(good) < 3:
        return 0
    src = a.points[[m.queryIdx for m in good]]
    dst = b.points[[m.trainIdx for m in good]]
    _, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=REPROJECTION_PX)
    return 0 if mask is None else int(mask.sum())
