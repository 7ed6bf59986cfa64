"""The 2015 entries' additions to the baselines (the ResNet paper's Appendices A-C), each against a hand
computation: box refinement and box voting (tasks.heads.refinement), global context (the C4 head's
ContextBoxHead; its training is in test_learning.py, its exact resume in test_resume.py), detector ensembles
(tasks.heads.ensemble), multi-scale testing (tasks.heads.multiscale);
the ensembles of checkpoints on the command line are in test_commands.py."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.ops import MultiScaleRoIAlign

from backbones import build_backbone
from tasks.detect import DetectionTask
from tasks.heads.ensemble import detect_ensemble, incompatibility
from tasks.heads.faster_rcnn import build_faster_rcnn
from tasks.heads.mask_rcnn import build_mask_rcnn
from tasks.heads.multiscale import PAPER_SIDES, PyramidStage, choose_scales, detect_multiscale
from tasks.heads.refinement import detect_refined
from tasks.heads.region_passes import box_voting, candidates, region_predictions, select
from tasks.heads.tta import detect_with_tta

SIDE = 200
#: proposals D, E (40 px wide) and C (30 px), x1 y1 x2 y2
PROPOSALS = torch.tensor([[82.0, 20, 122, 60], [65, 20, 105, 60], [10, 120, 40, 150]])


class XRamp(nn.Module):
    """A 'backbone' whose one feature channel is each pixel's x coordinate: RoIAlign (torchvision's, unaligned,
    2 x 2 samples averaged) of a box on it reads the box's centre x."""

    out_channels = 1

    def forward(self, x):
        ramp = torch.arange(x.shape[-1], dtype=x.dtype).expand(x.shape[0], 1, x.shape[-2], x.shape[-1])
        return OrderedDict([("0", ramp)])


class FixedProposals(nn.Module):
    def forward(self, images, features, targets=None):
        return [PROPOSALS.clone() for _ in images.image_sizes], {}


class RecordingPool(MultiScaleRoIAlign):
    """torchvision's pooler, remembering the boxes each call pools and the features it reads."""

    def __init__(self) -> None:
        super().__init__(["0"], output_size=1, sampling_ratio=2)
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, boxes, image_shapes):
        out = super().forward(x, boxes, image_shapes)
        self.calls.append((torch.cat(boxes), out.flatten(1)))
        return out


class ShiftingPredictor(nn.Module):
    """Class 1 scored ``p = centre x / 200`` (read from the pooled feature), class 2 never; every box regressed by
    ``dx = 0.05`` of its width to the right (a delta of 0.5 before the box coder's weight of 10), nothing else."""

    def forward(self, x):
        p = x[:, 0] / SIDE
        logits = torch.stack([torch.log(1 - p), torch.log(p), torch.full_like(p, -30.0)], 1)
        deltas = torch.zeros(len(x), 3 * 4)
        deltas[:, 4] = 0.5
        return logits, deltas


def _hand_built() -> FasterRCNN:
    detector = FasterRCNN(
        XRamp(), min_size=SIDE, max_size=SIDE, image_mean=[0.0] * 3, image_std=[1.0] * 3,
        box_roi_pool=RecordingPool(), box_head=nn.Flatten(), box_predictor=ShiftingPredictor(),
    )  # fmt: skip
    detector.rpn = FixedProposals()
    return detector.eval()


def test_box_refinement_pools_from_the_regressed_boxes_then_nms_at_0_3_and_voting_give_the_hand_computed_boxes():
    detector = _hand_built()
    image = torch.zeros(3, SIDE, SIDE)
    with torch.no_grad():
        plain = detector([image])[0]
    # plain (first pass only, NMS at the detector's 0.5): D, E, C each moved by 0.05 x width, scored by the
    # proposal's centre: D 102/200, E 85/200, C 25/200; D's and E's boxes overlap at IoU 23/57 = 0.40, so both stay
    assert plain["boxes"].tolist() == [[84.0, 20, 124, 60], [67, 20, 107, 60], [11.5, 120, 41.5, 150]]
    assert plain["scores"].tolist() == pytest.approx([0.51, 0.425, 0.125])
    pool = detector.roi_heads.box_roi_pool
    pool.calls.clear()
    refined = detect_refined(detector, [image])[0]
    # the second pass pools from the first pass's regressed boxes, and reads those boxes' centres
    (first_boxes, first_read), (second_boxes, second_read) = pool.calls
    assert torch.equal(first_boxes, PROPOSALS)
    assert second_boxes.tolist() == plain["boxes"].tolist()
    assert first_read[:, 0].tolist() == [102.0, 85.0, 25.0] and second_read[:, 0].tolist() == [104.0, 87.0, 26.5]
    # the union (x1: score): D 84: .51, E 67: .425, C 11.5: .125 (first pass); 86: .52, 69: .435, 13: .1325
    # (second). NMS at 0.3: 86 keeps, and removes 84 (IoU 38/42), 69 (IoU 23/57 = 0.40 -- plain NMS at 0.5 keeps
    # such a box) and 67 (IoU 21/59); 13 keeps and removes 11.5. Voting at IoU >= 0.5, weighted by score:
    # (86 x .52 + 84 x .51) / 1.03 = 85.00971, (13 x .1325 + 11.5 x .125) / .2575 = 12.27184
    x_d, x_c = 87.56 / 1.03, 3.16 / 0.2575
    torch.testing.assert_close(
        refined["boxes"], torch.tensor([[x_d, 20, x_d + 40, 60], [x_c, 120, x_c + 30, 150]]), rtol=0, atol=1e-4
    )
    assert refined["scores"].tolist() == pytest.approx([0.52, 0.1325]) and refined["labels"].tolist() == [1, 1]


def test_box_voting_averages_only_the_same_class_boxes_overlapping_at_half():
    kept = torch.tensor([[0.0, 0, 10, 10]])
    pool = torch.tensor([[0.0, 0, 10, 10], [2, 0, 12, 10], [6, 0, 16, 10], [1, 0, 11, 10]])
    scores = torch.tensor([0.6, 0.3, 0.9, 0.5])
    labels = torch.tensor([1, 1, 1, 2])
    # [2, 12] overlaps at 8/12 >= 0.5 and joins; [6, 16] at 4/16 does not; [1, 11] is another class
    voted = box_voting(kept, torch.tensor([1]), pool, scores, labels)
    assert voted.tolist() == [pytest.approx([(0 * 0.6 + 2 * 0.3) / 0.9, 0, (10 * 0.6 + 12 * 0.3) / 0.9, 10])]
    assert box_voting(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), pool, scores, labels).shape == (0, 4)


#: both heads and both detectors, each once
BOTH = [(build_faster_rcnn, "c4"), (build_mask_rcnn, "fpn")]
SMALL = {"rpn_post_nms_top_n_test": 50, "box_score_thresh": 0.0, "fpn_channels": 32}


@pytest.mark.parametrize("head", ["c4", "fpn"])
def test_the_passes_taken_apart_are_torchvisions_post_processing_exactly(head):
    torch.manual_seed(0)
    net = build_faster_rcnn(build_backbone("resnet18"), head=head, num_classes=4, min_size=64, max_size=64,
                            **SMALL).eval()  # fmt: skip
    images = [torch.rand(3, 64, 48), torch.rand(3, 40, 64)]
    with torch.no_grad():
        batch, _ = net.transform(images)
        features = net.backbone(batch.tensors)
        proposals, _ = net.rpn(batch, features)
        heads = net.roi_heads
        logits, regression = heads.box_predictor(
            heads.box_head(heads.box_roi_pool(features, proposals, batch.image_sizes))
        )
        expected = heads.postprocess_detections(logits, regression, proposals, batch.image_sizes)
        probabilities, boxes = region_predictions(heads, features, proposals, batch.image_sizes)
        found = candidates(heads, probabilities, boxes, [len(p) for p in proposals], batch.image_sizes)
        ours = select(heads, found)
    for ours_k, boxes_k, scores_k, labels_k in zip(ours, *expected):
        assert torch.equal(ours_k["boxes"], boxes_k) and torch.equal(ours_k["scores"], scores_k)
        assert torch.equal(ours_k["labels"], labels_k) and len(boxes_k) > 10


@pytest.mark.parametrize(("build", "head"), BOTH, ids=["faster-c4", "mask-fpn"])
def test_refinement_runs_on_both_heads_of_both_detectors_and_keeps_the_outputs_contract(build, head):
    torch.manual_seed(0)
    net = build(build_backbone("resnet18"), head=head, num_classes=3, min_size=64, max_size=64, **SMALL).eval()
    images = [torch.rand(3, 64, 48), torch.rand(3, 40, 64)]
    with torch.no_grad():
        plain = net(images)
    refined = detect_refined(net, images)
    for image, p, r in zip(images, plain, refined):
        assert set(r) == set(p) and 0 < len(r["boxes"]) <= net.roi_heads.detections_per_img
        assert (r["boxes"][:, 2:] <= torch.tensor(image.shape[-1:-3:-1]) + 1e-4).all()  # in the image's pixels
        assert (r["scores"][:-1] >= r["scores"][1:]).all()
        if "masks" in p:  # masks predicted on the refined boxes, pasted at the image's size
            assert r["masks"].shape == (len(r["boxes"]), 1, *image.shape[-2:])


def test_the_option_off_is_todays_detections_and_on_composes_with_tta():
    torch.manual_seed(0)
    task = DetectionTask(backbone="resnet18", num_classes=2, norm="bn", freeze_at=0, min_size=64, max_size=64,
                         fpn_channels=32, box_score_thresh=0.0).eval()  # fmt: skip
    images = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        plain = task.detector(images)[0]
        off = task.detect(images)[0]
        assert all(torch.equal(plain[k], off[k]) for k in plain)
        task.box_refinement = True
        on = task.detect(images)[0]
        assert all(torch.equal(on[k], v) for k, v in detect_refined(task.detector, images)[0].items())
        task.tta = ([1.0], False)  # one view: the refined detections, through TTA's merging
        one_view = task.detect(images)[0]
    expected = detect_with_tta(task.detector, images, [1.0], False, run=lambda x: detect_refined(task.detector, x))
    assert all(torch.equal(one_view[k], expected[0][k]) for k in one_view)


# -- ensembles -------------------------------------------------------------------------------------------------
def _detector(seed: int, build=build_faster_rcnn, head: str = "fpn", **options):
    torch.manual_seed(seed)
    args = {"num_classes": 3, "min_size": 64, "max_size": 64, **SMALL, **options}
    return build(build_backbone("resnet18"), head=head, **args).eval()


def _plain_and(build, head, other):
    """A detector's own detections on two images of other sizes, and ``other(detector, images)``'s."""
    net = _detector(0, build, head)
    images = [torch.rand(3, 64, 48), torch.rand(3, 40, 64)]
    with torch.no_grad():
        plain = net(images)
    return net, images, plain, other(net, images)


def _same(a: list[dict], b: list[dict]) -> bool:
    return all(set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(("build", "head"), BOTH, ids=["faster-c4", "mask-fpn"])
def test_an_ensemble_of_one_detector_is_that_detector_exactly(build, head):
    _, _, plain, one = _plain_and(build, head, lambda net, images: detect_ensemble([net], images))
    assert _same(plain, one)


def test_two_detectors_share_the_union_of_their_proposals_and_average_their_heads():
    """The paper's scheme computed directly from torchvision's parts: each member's proposals, joined; each
    member's head on the union; softmax and decoded boxes averaged; torchvision's post-processing."""
    members = [_detector(0), _detector(1)]
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    with torch.no_grad():
        batch, _ = members[0].transform(images)
        sizes = batch.image_sizes
        features = [m.backbone(batch.tensors) for m in members]
        union = [torch.cat(pair) for pair in zip(*(m.rpn(batch, f)[0] for m, f in zip(members, features)))]
        probabilities, boxes = 0, 0
        for m, f in zip(members, features):
            h = m.roi_heads
            logits, regression = h.box_predictor(h.box_head(h.box_roi_pool(f, union, sizes)))
            probabilities = probabilities + logits.softmax(-1) / 2
            boxes = boxes + h.box_coder.decode(regression, union) / 2
        heads = members[0].roi_heads
        regression = heads.box_coder.encode_single(boxes.reshape(-1, 4), torch.cat(union).repeat_interleave(3, 0))
        found = heads.postprocess_detections(probabilities.log(), regression.reshape(len(boxes), -1), union, sizes)
        expected = members[0].transform.postprocess(
            [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in zip(*found)], sizes, [(64, 64), (48, 64)]
        )
    ours = detect_ensemble(members, images)
    for e, o in zip(expected, ours):
        assert len(o["boxes"]) > 5 and torch.equal(e["labels"], o["labels"])
        torch.testing.assert_close(o["boxes"], e["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(o["scores"], e["scores"], atol=1e-6, rtol=0)
    # neither member alone gives these detections
    with torch.no_grad():
        assert all(not torch.equal(m(images)[0]["scores"], ours[0]["scores"]) for m in members)


def test_members_that_see_other_images_are_merged_by_their_detections_with_box_voting():
    members = [_detector(0), _detector(1, min_size=48, max_size=48)]
    assert incompatibility(members) == "member 1 has min_size=(48,), member 0 (64,)"
    images = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        each = [m(images)[0] for m in members]
    merged = detect_ensemble(members, images)[0]
    pooled_scores = torch.cat([e["scores"] for e in each])
    # every kept score is one of the members' (NMS keeps detections; voting moves boxes only), best first
    assert all((pooled_scores == s).any() for s in merged["scores"]) and len(merged["scores"]) > 0
    assert (merged["scores"][:-1] >= merged["scores"][1:]).all()
    masks = [_detector(0, build_mask_rcnn, "fpn"), _detector(1, build_mask_rcnn, "c4")]  # 28x28 and 14x14 masks
    assert incompatibility(masks) is None
    out = detect_ensemble(masks, images)[0]
    assert out["masks"].shape == (len(out["boxes"]), 1, 64, 64)


# -- global context --------------------------------------------------------------------------------------------
def test_global_context_concatenates_the_whole_images_res5_feature_to_every_regions():
    net = _detector(0, head="c4", global_context=True, min_size=64, max_size=96)
    heads = net.roi_heads
    channels = heads.box_head.out_channels
    assert heads.box_predictor.cls_score.in_features == 2 * channels  # the region's and the image's features
    images = [torch.rand(3, 64, 96), torch.rand(3, 64, 80)]
    regions = [torch.tensor([[0.0, 0, 30, 30], [40, 10, 90, 60]]), torch.tensor([[5.0, 5, 25, 45]])]
    with torch.no_grad():
        batch, _ = net.transform(images)
        features = net.backbone(batch.tensors)
        found = heads.box_head(heads.box_roi_pool(features, regions, batch.image_sizes))
        # the same pooler and res5, without context, on the regions and on each image's whole extent
        plain = super(type(heads.box_roi_pool), heads.box_roi_pool).forward
        whole = [torch.tensor([[0.0, 0, w, h]]) for h, w in batch.image_sizes]
        pooled = lambda boxes: torch.flatten(  # noqa: E731
            torch.nn.functional.adaptive_avg_pool2d(heads.box_head.res5(plain(features, boxes, batch.image_sizes)), 1),
            1,
        )
        regional, context = pooled(regions), pooled(whole)
    assert found.shape == (3, 2 * channels)
    torch.testing.assert_close(found[:, :channels], regional)
    torch.testing.assert_close(found[:, channels:], context[[0, 0, 1]])


def test_only_with_global_context_does_a_far_away_change_move_every_regions_score():
    """A wide image: pixels far beyond res4's receptive field of the region change. Without context the region
    scores stay exactly the same; with it every region's scores move."""
    image = torch.rand(3, 64, 512)
    changed = image.clone()
    changed[:, :, 448:] = torch.rand(3, 64, 64)
    regions = [torch.tensor([[0.0, 0, 32, 32], [8, 16, 40, 56]])]
    for context in (False, True):
        net = _detector(0, head="c4", global_context=context, min_size=64, max_size=512)
        scores = []
        for x in (image, changed):
            with torch.no_grad():
                batch, _ = net.transform([x])
                assert batch.image_sizes == [(64, 512)]
                probabilities, _ = region_predictions(net.roi_heads, net.backbone(batch.tensors), regions,
                                                      batch.image_sizes)  # fmt: skip
            scores.append(probabilities)
        if context:
            assert all(not torch.allclose(a, b, atol=1e-6) for a, b in zip(*scores))  # every region moves
        else:
            assert torch.equal(*scores)


def test_global_context_is_refused_with_fpn_naming_the_flag():
    with pytest.raises(ValueError, match="global_context is the C4 head's.*use --model.head c4"):
        _detector(0, head="fpn", global_context=True)


# -- multi-scale testing ------------------------------------------------------------------------------------------
#: the paper's pyramid against a detector tested at 600: ratios 1/3 ... 5/3
PAPER_RATIOS = [s / 600 for s in PAPER_SIDES]


@pytest.mark.parametrize(
    ("side", "ratios", "expected"),
    [
        (100, PAPER_RATIOS, (3, 4)),  # 33 ... 167 px: never reaches 224, the two largest scales
        (150, PAPER_RATIOS, (3, 4)),  # 200 at 800, 250 at 1000
        (200, PAPER_RATIOS, (2, 3)),  # 200 at 600, 267 at 800
        (300, PAPER_RATIOS, (1, 2)),  # 200 at 400, 300 at 600
        (336, PAPER_RATIOS, (0, 1)),  # 112 at 200, exactly 224 at 400
        (500, PAPER_RATIOS, (0, 1)),  # 167 at 200, 333 at 400
        (900, PAPER_RATIOS, (0, 1)),  # 300 already at 200: the two smallest
        (50, [1.0], (0, 0)),  # one scale: that scale twice
        (300, [0.5, 1.0], (0, 1)),
    ],
)
def test_each_region_gets_the_two_adjacent_scales_around_224_px(side, ratios, expected):
    lower, upper = choose_scales(torch.tensor([float(side)]), ratios)
    assert (int(lower), int(upper)) == expected


class SignedRamps(nn.Module):
    """Two feature channels: each pixel's x coordinate and its negative. A region pooled at a scale ``r`` of the
    image reads ``r x`` its centre and ``-r x`` its centre, so the maxout of two scales is the larger scale's
    first channel and the smaller scale's second."""

    out_channels = 2

    def forward(self, x):
        ramp = torch.arange(x.shape[-1], dtype=x.dtype).expand(x.shape[0], 1, x.shape[-2], x.shape[-1])
        return OrderedDict([("0", torch.cat([ramp, -ramp], 1))])


def test_the_maxout_is_the_element_wise_max_of_the_two_chosen_scales_region_features():
    detector = _hand_built()
    detector.backbone = SignedRamps()
    image = torch.zeros(3, SIDE, SIDE)
    # the pyramid 200 (the detector's own), 400, 800: ratios 1, 2, 4
    regions = [torch.tensor([[82.0, 20, 122, 60], [20, 20, 170, 170]])]
    with torch.no_grad():
        stage = PyramidStage(detector, [image], [400, 800, 200])
        ((lower, upper),) = stage.scales_of(regions)
        features = stage.region_features(regions)
    # D is 40 px: 40, 80, 160 never reach 224 -> scales 1 and 2 (x2, x4); the 150-px region reaches 300 at x2 ->
    # scales 0 and 1 (x1, x2)
    assert lower.tolist() == [1, 0] and upper.tolist() == [2, 1]
    # D's centre 102: max(2 x 102, 4 x 102) = 408 and max(-204, -408) = -204; the other's centre 95: 190 and -95
    assert features.tolist() == [[408.0, -204.0], [190.0, -95.0]]


def test_multiscale_target_moves_the_size_the_two_scales_bracket_through_the_task_option():
    """``--model.multiscale_target``: for the same regions and pyramid, a target of 60 px picks the scales
    around 60 (the 40-px region: x1, x2; the 150-px one: already at x1, the two smallest)."""
    detector = _hand_built()
    detector.backbone = SignedRamps()
    regions = [torch.tensor([[82.0, 20, 122, 60], [20, 20, 170, 170]])]
    with torch.no_grad():
        ((lower, upper),) = PyramidStage(detector, [torch.zeros(3, SIDE, SIDE)], [400, 800, 200], 60).scales_of(regions)
    assert lower.tolist() == [0, 0] and upper.tolist() == [1, 1]
    task = DetectionTask(backbone="resnet18", num_classes=2, min_size=64, max_size=64).eval()
    task.set_prediction_options(multiscale_testing=[32, 64, 128], multiscale_target=40)
    image = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        found = task.detect(image)
        assert _same(found, detect_multiscale(task.detector, image, [32, 64, 128], 40))
        assert not _same(found, detect_multiscale(task.detector, image, [32, 64, 128]))


@pytest.mark.parametrize(("build", "head"), BOTH, ids=["faster-c4", "mask-fpn"])
def test_multiscale_testing_at_the_detectors_own_scale_alone_is_plain_testing_exactly(build, head):
    net, images, plain, one = _plain_and(build, head, lambda net, images: detect_multiscale(net, images, [64]))
    assert _same(plain, one)
    assert _same(detect_refined(net, images), detect_refined(net, images, pyramid=[64]))
    pyramid = detect_multiscale(net, images, [32, 64, 96])  # a pyramid moves the scores
    assert not torch.equal(pyramid[0]["scores"], plain[0]["scores"])
    assert all(len(p["boxes"]) == len(p["scores"]) for p in pyramid)


def test_multiscale_testing_with_global_context_reads_each_scales_whole_image():
    net = _detector(0, head="c4", global_context=True)
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    found = detect_multiscale(net, images, [32, 64, 128])
    assert [len(f["boxes"]) > 0 for f in found] == [True, True]


@pytest.mark.slow  # a torch.export trace of a C4 detector: the long tier
def test_a_c4_detector_with_global_context_exports_and_equals_eager():
    from tasks.heads.exportable import OneImageDetector, traceable_detector

    torch.manual_seed(0)
    options = {
        "norm": "bn",
        "freeze_at": 0,
        "min_size": 64,
        "max_size": 64,
        "detector_args": {"rpn_post_nms_top_n_test": 20},
    }
    task = DetectionTask(backbone="resnet18", num_classes=2, head="c4", global_context=True, **options).eval()
    module = OneImageDetector(task.detector, task.detection_keys)
    image = torch.rand(3, 64, 64)
    with traceable_detector():
        program = torch.export.export(module, (image,), strict=False)
    with torch.no_grad():
        exported, eager = program.module()(image), module(image)
    assert len(eager[0]) > 0
    for a, b in zip(exported, eager):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=0)


# -- localization's RPN+R-CNN stage ---------------------------------------------------------------------------
def test_class_proposals_are_the_rpns_best_anchors_for_that_class_regressed():
    from tasks.heads.loc_rcnn import class_proposals
    from tasks.heads.localization import Localizer

    localizer = Localizer(build_backbone("cifar_resnet20", num_classes=2), head="rpn")
    anchors = torch.tensor([[0.0, 0, 10, 10], [5, 5, 25, 25], [20, 0, 40, 20], [0, 20, 30, 40]])
    scores = torch.tensor([[[0.1, 0.9], [0.8, 0.2], [0.5, 0.7], [0.3, -1.0]]])  # 1 image x 4 anchors x 2 classes
    deltas = torch.zeros(1, 4, 2, 4)
    deltas[0, 2, 1] = torch.tensor([0.1, 0.0, 0.0, 0.0])  # anchor 2 moved right by 0.1 of its width for class 1
    out = {"anchors": anchors, "scores": scores, "deltas": deltas}
    boxes, best = class_proposals(localizer, out, torch.tensor([[1, 0]]), (40, 40), top=2)
    # class 1: anchors 0 (0.9) and 2 (0.7, moved by 2 px); class 0: anchors 1 (0.8) and 2 (0.5, not moved)
    assert boxes.tolist() == [[[[0.0, 0, 10, 10], [22, 0, 40, 20]], [[5, 5, 25, 25], [20, 0, 40, 20]]]]
    assert best.tolist() == [[pytest.approx([0.9, 0.7]), pytest.approx([0.8, 0.5])]]


class FixedScorer(nn.Module):
    """The R-CNN's two sibling layers' outputs fixed per region: region k scores ``scores[k]`` for class 1 and
    regresses its class-1 box by ``dx = 0.1`` of its width (a delta of 1 before the box coder's weight of 10)."""

    def __init__(self, scores):
        super().__init__()
        self.scores = torch.tensor(scores)

    def __call__(self, crops):
        logits = torch.stack([torch.zeros_like(self.scores), torch.log(self.scores / (1 - self.scores)),
                              torch.full_like(self.scores, -30.0)], 1)  # fmt: skip
        deltas = torch.zeros(len(self.scores), 3 * 4)
        deltas[:, 4] = 1.0
        return logits, deltas


def test_the_rcnn_keeps_the_proposal_it_scores_best_for_the_class_with_its_regressed_box():
    from tasks.heads.loc_rcnn import RegionScorer

    scorer = RegionScorer(build_backbone("cifar_resnet20", num_classes=2), num_classes=2, crop=16)
    proposals = torch.tensor([[[[0.0, 0, 20, 20], [10, 10, 30, 30], [5, 0, 15, 40]]]])  # 1 image, class 0, 3 regions
    assert scorer.warp(torch.rand(1, 3, 40, 40), list(proposals[0])).shape == (3, 3, 16, 16)
    object.__setattr__(scorer, "forward", FixedScorer([0.2, 0.7, 0.4]))
    box, score = scorer.rescore(torch.rand(1, 3, 40, 40), proposals, torch.tensor([[0]]))
    # the second proposal (0.7) wins; its class-1 (label 0 + background) box moved by 0.1 x 20 px
    assert box.tolist() == [[pytest.approx([12.0, 10, 32, 30])]] and score.tolist() == [[pytest.approx(0.7)]]


def test_the_rcnn_scores_many_regions_in_chunks_with_the_one_passs_numbers(monkeypatch):
    from tasks.heads import loc_rcnn

    torch.manual_seed(0)
    scorer = loc_rcnn.RegionScorer(build_backbone("cifar_resnet20"), num_classes=3, crop=16).eval()
    images, boxes = torch.rand(2, 3, 40, 40), torch.rand(2, 10, 2) * 20
    boxes = torch.cat([boxes, boxes + 5 + torch.rand(2, 10, 2) * 15], dim=2)  # 20 valid boxes
    with torch.no_grad():
        whole = scorer.score(images, boxes)
        monkeypatch.setattr(loc_rcnn, "CHUNK", 3)  # 20 regions: 7 passes
        calls = []
        scorer.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
        chunked = scorer.score(images, boxes)
    assert calls == [3] * 6 + [2]
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_the_rcnn_stage_trains_on_its_classes_proposals_and_the_rpn_stays_frozen():
    from tasks.heads.loc_rcnn import RegionScorer, TwoStageLocalizer
    from tasks.heads.localization import Localizer

    torch.manual_seed(0)
    rpn = Localizer(build_backbone("cifar_resnet20", num_classes=3), head="rpn")
    model = TwoStageLocalizer(rpn, RegionScorer(build_backbone("cifar_resnet20"), 3, crop=16, regions=32), 20)
    model.train()
    assert not rpn.training and not any(p.requires_grad for p in rpn.parameters())
    images, labels = torch.rand(2, 3, 32, 32), torch.tensor([0, 2])
    targets = [torch.tensor([[4.0, 4, 20, 24]]), torch.tensor([[10.0, 8, 30, 30]])]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = {k: v.clone() for k, v in rpn.state_dict().items()}
    losses = []
    for _ in range(6):
        torch.manual_seed(0)  # the same sampled regions: only the weights change
        loss = model.box_loss(model(images), labels, targets, (32, 32))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(torch.equal(before[k], v) for k, v in rpn.state_dict().items())  # BN statistics too
    # a batch without boxes (ILSVRC's training images mostly have none): a zero reaching every R-CNN layer, so
    # that DDP finds no unused parameter
    optimizer.zero_grad()
    empty = model.box_loss(model(images), labels, [torch.zeros(0, 4), torch.zeros(0, 4)], (32, 32))
    empty.backward()
    assert float(empty) == 0 and all(p.grad is not None for p in model.rcnn.parameters())
    out = model.eval()(images)
    assert model.boxes_for(out, torch.tensor([[0, 1], [2, 0]]), (32, 32)).shape == (2, 2, 4)
