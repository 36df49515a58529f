#!/usr/bin/env python
"""Train or evaluate a seg_methods model.

    python train_net.py --config-file CONFIG [--resume] [opts ...]
    python train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS path/to/model.pth

All logic lives in ``seg_methods.engine``; this file only wires the command line to it.
"""

from detectron2.engine import default_argument_parser, launch

from seg_methods.engine import evaluate_checkpoint, setup, train


def main(args):
    cfg = setup(args)
    if args.eval_only:
        return evaluate_checkpoint(cfg, resume=args.resume)
    return train(cfg, resume=args.resume)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
