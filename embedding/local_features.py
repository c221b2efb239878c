"""Local features and geometric verification: do two images show the same picture, however much
one was cropped, rotated, recoloured or recompressed?

A global embedding blurs a heavily cropped copy into "a similar scene"; local features do not.
SIFT keypoints (OpenCV) of both images are matched with Lowe's ratio test, and RANSAC fits a
similarity transform (rotation, scale, translation: what crops, turns and resizes do) to the
matches. The matches that agree with it, the inliers, say whether the two are one picture:
unrelated images rarely have more than a handful by chance. Where they fall in the query says
which of several verified copies is its source: the original explains all of an edited copy,
a crop of the original only the part it shows.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from embedding.decode import decode_image

# Longer side the features are taken at: enough detail for SIFT, a fraction of a full decode's
# cost. A query under half of it is enlarged to it: a heavily edited copy is often under 100 px,
# too few pixels for SIFT's finer scales (enlarged, heavy-edit recall@1 rose by 0.03-0.06 on
# scene15, docs/quality.md); a larger one is not, as enlarging would only add keypoints to match.
MAX_SIDE = 384
ENLARGE_BELOW = MAX_SIDE // 2
MAX_FEATURES = 1000
MIN_SIDE = 16  # SIFT describes a keypoint by a 16x16 window around it
RATIO = 0.8             # Lowe's ratio test: best match clearly better than the second best
REPROJECTION_PX = 6.0   # RANSAC: a match within this many pixels of the fitted transform is an inlier

cv2.setNumThreads(1)  # callers run several verifications in threads of their own


@dataclass
class Features:
    """Keypoint positions (n, 2) float32 and SIFT descriptors (n, 128) uint8 of one image, and
    the (width, height) they were taken at. OpenCV's SIFT values are whole numbers 0..255 in
    float32: kept as bytes, a cached image costs a quarter of the memory (about 130 KB)."""

    points: np.ndarray
    descriptors: np.ndarray
    size: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.points.nbytes + self.descriptors.nbytes


@dataclass(frozen=True)
class Match:
    """How one similarity transform relates a query to a candidate: `inliers`, the distinct
    keypoints it explains, and `coverage`, the share of the two pictures' areas they span (the
    mean of the query's share and the candidate's). The closest copy covers both: the original
    of a mild edit all of each, a crop of the original only part of the query, a larger picture
    that holds the query only part of itself."""

    inliers: int
    coverage: float
    # Share of the query's frame that the transform puts inside the candidate's: about 1 for a
    # crop, resize or turn of the candidate, well under it for an overlapping shot of the same
    # scene (a camera panned), which can share as many inliers.
    contained: float = 0.0


NO_MATCH = Match(0, 0.0)


def extract(rgb: np.ndarray, max_features: int = MAX_FEATURES, enlarge: bool = False) -> Features:
    """SIFT features of an HxWx3 uint8 image, scaled so its longer side is at most MAX_SIDE
    (exactly MAX_SIDE with `enlarge` when it is under ENLARGE_BELOW)."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    scale = MAX_SIDE / max(gray.shape)
    if scale < 1 or (enlarge and max(gray.shape) < ENLARGE_BELOW):
        # A banner (2000x1) would scale to height 0, which OpenCV refuses: at least one pixel.
        gray = cv2.resize(gray, (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale))),
                          interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    size = (gray.shape[1], gray.shape[0])
    if min(gray.shape) < MIN_SIDE:  # thinner than one SIFT descriptor's window: nothing to match
        return Features(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.uint8), size)
    keypoints, descriptors = cv2.SIFT_create(nfeatures=max_features).detectAndCompute(gray, None)
    if descriptors is None:
        return Features(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.uint8), size)
    return Features(np.float32([k.pt for k in keypoints]), descriptors.astype(np.uint8), size)


def features_of(data: bytes, *, max_bytes: int, max_pixels: int, query: bool = False) -> Features:
    """Features of image bytes, decoded with the upload limits (raises ImageDecodeError); a small
    `query` is enlarged (ENLARGE_BELOW)."""
    img = decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels, draft=MAX_SIDE)
    return extract(np.asarray(img), enlarge=query)


def _distinct(points: np.ndarray) -> int:
    # SIFT puts several keypoints on one spot (one per dominant orientation); counted once, they
    # stop a single repeated corner from passing for many agreeing matches.
    return len(np.unique(np.round(points).astype(np.int32), axis=0))


def match(query: Features, candidate: Features) -> Match:
    """The similarity transform from query to candidate that most ratio-tested matches agree with:
    its distinct inliers (on both sides) and the coverage of their convex hulls (Match)."""
    if len(query.descriptors) < 2 or len(candidate.descriptors) < 2:
        return NO_MATCH
    q, c = query.descriptors.astype(np.float32), candidate.descriptors.astype(np.float32)
    # Squared distances by one matrix product (BLAS): several times faster than cv2.BFMatcher's loops.
    d = (q * q).sum(1)[:, None] - 2 * (q @ c.T) + (c * c).sum(1)[None, :]
    two = np.partition(d, 1, axis=1)[:, :2]
    good = np.flatnonzero(two[:, 0] < RATIO * RATIO * two[:, 1])
    if len(good) < 3:
        return NO_MATCH
    src = query.points[good]
    dst = candidate.points[d[good].argmin(axis=1)]
    transform, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=REPROJECTION_PX)
    if mask is None:
        return NO_MATCH
    keep = mask.ravel().astype(bool)
    inliers = min(_distinct(src[keep]), _distinct(dst[keep]))
    if inliers < 3:
        return Match(inliers, 0.0)
    coverage = (_hull_share(src[keep], query.size) + _hull_share(dst[keep], candidate.size)) / 2
    return Match(inliers, round(coverage, 3), round(_contained(transform, query.size, candidate.size), 3))


def _hull_share(points: np.ndarray, size: tuple[int, int]) -> float:
    area = cv2.contourArea(cv2.convexHull(points.reshape(-1, 1, 2)))
    return min(1.0, float(area) / float(size[0] * size[1]))


def _contained(transform: np.ndarray, size: tuple[int, int], into: tuple[int, int]) -> float:
    w, h = size
    frame = np.float32([[0, 0], [w, 0], [w, h], [0, h]]) @ transform[:, :2].T.astype(np.float32) + \
        transform[:, 2].astype(np.float32)
    area = cv2.contourArea(frame)
    if area <= 0:
        return 0.0
    inside, _ = cv2.intersectConvexConvex(frame, np.float32([[0, 0], [into[0], 0], [into[0], into[1]], [0, into[1]]]))
    return min(1.0, float(inside) / float(area))
