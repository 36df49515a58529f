"""Training/evaluation machinery: Trainer, hooks, results files, drawings, entry points,
multi-process launch (CPU-capable)."""

from .predictor import build_predictor  # noqa: F401
from .hooks import METRICS_FILE, SegEvalHook, report_results  # noqa: F401
from .launch import (  # noqa: F401
    CPUSyncBatchNorm,
    broadcast_buffers,
    convert_sync_batchnorm_for_cpu,
    cpu_capable_ddp,
    create_ddp_model,
    launch,
)
from .results import flatten_metrics, format_metrics_table, write_metrics_json  # noqa: F401
from .trainer import (  # noqa: F401
    TRAINING_LOG_FILE,
    VIS_DIR,
    Trainer,
    build_checkpointer,
    evaluate_checkpoint,
    resolve_device,
    setup,
    train,
)
from .visualization import (  # noqa: F401
    PREDICTION_KINDS,
    available_prediction_kinds,
    draw_ground_truth,
    draw_prediction,
    visualize_dataset_predictions,
    visualize_predictions,
)
