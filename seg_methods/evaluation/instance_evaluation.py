"""COCO mask AP (and, on request, box AP) with the official (pure-Python) COCO API.

detectron2's ``COCOEvaluator`` assumes that the thing classes occupy the contiguous ids
``0..T-1``. Panoptic datasets (ADE20K, Mapillary Vistas, ...) use one id space for things and
stuff, so thing ids can be sparse, and a model trained on them may also put stuff classes in its
instance output. :class:`InstanceSegEvaluator` maps predicted thing classes to ranks ``0..T-1``,
drops non-thing predictions, adds the placeholder boxes COCO's json conversion needs, and always
uses the official COCO evaluation (the fast C++ one needs detectron2's compiled ``_C``).
"""

import logging
from typing import Dict, List, Optional

import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, Instances

logger = logging.getLogger(__name__)


class _ThingRankMetadata:
    """Read-only view of a dataset's metadata in which thing classes are numbered by rank.

    ``thing_dataset_id_to_contiguous_id`` maps each dataset id to the rank of its contiguous id
    among the thing ids; ``thing_classes`` lists the names in rank order. Every other attribute
    is the original metadata's.
    """

    def __init__(self, metadata, rank_of: Dict[int, int], names: Optional[List[str]]):
        self._metadata = metadata
        self.thing_dataset_id_to_contiguous_id = {
            d: rank_of[c] for d, c in metadata.thing_dataset_id_to_contiguous_id.items()
        }
        if names is not None:
            self.thing_classes = names

    def __getattr__(self, name):  # only called for attributes not set above
        return getattr(self._metadata, name)

    def get(self, name, default=None):
        return getattr(self, name, default)


class InstanceSegEvaluator(COCOEvaluator):
    """``COCOEvaluator`` for mask AP ("segm") that accepts sparse thing ids.

    With ``box_ap=True`` (``TEST.BOX_AP``) it also reports box AP ("bbox") from the predicted
    ``pred_boxes``, as Table 1 of Unifying Training and Inference does. That needs a model that
    predicts boxes (a detector); mask-classification models carry placeholder boxes, so their
    box AP would be meaningless: predictions without ``pred_boxes`` are refused, and all-zero
    boxes are warned about.

    Args:
        dataset_name (str): a registered dataset whose metadata has ``json_file`` (COCO instance
            json) and ``thing_dataset_id_to_contiguous_id``.
        output_dir (str or None): where predictions are written.
        distributed (bool): gather predictions from all ranks.
        max_dets_per_image (int or None): COCO's maxDets (default 100).
        box_ap (bool): also evaluate "bbox".
    """

    def __init__(
        self,
        dataset_name: str,
        output_dir: Optional[str] = None,
        *,
        distributed: bool = True,
        max_dets_per_image: Optional[int] = None,
        box_ap: bool = False,
    ):
        self._warned_zero_boxes = False
        super().__init__(
            dataset_name,
            tasks=("segm", "bbox") if box_ap else ("segm",),
            distributed=distributed,
            output_dir=output_dir,
            max_dets_per_image=max_dets_per_image,
            use_fast_impl=False,  # never the C++ COCOeval_opt
        )
        meta = MetadataCatalog.get(dataset_name)
        contiguous = sorted(meta.thing_dataset_id_to_contiguous_id.values())
        self._rank_of = {c: i for i, c in enumerate(contiguous)}
        if contiguous != list(range(len(contiguous))):
            # Names of the thing classes in rank order: indexed in the joint id space when
            # stuff_classes covers it (detectron2's panoptic convention), else thing_classes is
            # assumed to already be in rank order.
            all_names = meta.get("stuff_classes", None)
            if all_names is not None and len(all_names) > contiguous[-1]:
                names = [all_names[c] for c in contiguous]
            else:
                names = meta.get("thing_classes", None)
            self._metadata = _ThingRankMetadata(meta, self._rank_of, names)

    def _to_thing_ranks(self, output: Dict) -> Dict:
        if "instances" not in output:
            return output
        inst: Instances = output["instances"].to(self._cpu_device)
        thing = torch.tensor(
            [int(c) in self._rank_of for c in inst.pred_classes.tolist()], dtype=torch.bool
        )
        inst = inst[thing]
        inst.pred_classes = torch.tensor(
            [self._rank_of[int(c)] for c in inst.pred_classes.tolist()], dtype=torch.int64
        )
        if "bbox" in self._tasks:
            self._check_boxes(inst)
        elif not inst.has("pred_boxes"):
            # COCO json conversion reads boxes; "segm" AP does not use them.
            inst.pred_boxes = Boxes(torch.zeros(len(inst), 4))
        return dict(output, instances=inst)

    def _check_boxes(self, inst: Instances) -> None:
        if not inst.has("pred_boxes"):
            raise ValueError(
                "TEST.BOX_AP=True: the model's instance output has no 'pred_boxes'. Box AP needs "
                "a model that predicts boxes; set TEST.BOX_AP=False."
            )
        if len(inst) and not self._warned_zero_boxes and not inst.pred_boxes.area().any():
            self._warned_zero_boxes = True
            logger.warning(
                "TEST.BOX_AP=True but every predicted box of an image has zero area (placeholder "
                "boxes of a mask-classification model?): its box AP is not meaningful."
            )

    def process(self, inputs, outputs):
        super().process(inputs, [self._to_thing_ranks(o) for o in outputs])
