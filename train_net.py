#!/usr/bin/env python
"""Train or evaluate a seg_methods model.

    python train_net.py --config-file CONFIG [--resume] [opts ...]
    python train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS path/to/model.pth
    python train_net.py --config-file CONFIG --resume --resume-fallback  # skip a truncated last
    python train_net.py --config-file CONFIG --eval-only --random-weights  # on purpose only
    python train_net.py --config-file CONFIG --num-gpus 2  # 2 processes (gloo on a CPU machine)

All logic lives in ``seg_methods.engine``; this file only wires the command line to it.
"""

from detectron2.engine import default_argument_parser

from seg_methods.engine import evaluate_checkpoint, launch, setup, train
from seg_methods.engine.trainer import add_weights_arguments


def main(args):
    cfg = setup(args)
    # --random-weights / --resume-fallback: seg_methods.engine.trainer.add_weights_arguments
    fallback = getattr(args, "resume_fallback", False)
    if args.eval_only:
        return evaluate_checkpoint(
            cfg,
            resume=args.resume,
            allow_random_weights=getattr(args, "random_weights", False),
            resume_fallback=fallback,
        )
    return train(cfg, resume=args.resume, resume_fallback=fallback)


if __name__ == "__main__":
    args = add_weights_arguments(default_argument_parser()).parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
