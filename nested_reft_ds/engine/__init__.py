"""All DeepSpeed and torch.distributed code of the package lives here."""
from .internals import check_versions  # noqa: F401  (first: checks the pinned versions at import)
from .checkpoint import consolidated_state_dict, export_hf_model, latest_tag, load_checkpoint, save_checkpoint
from .distributed import (all_reduce_sum, barrier, check_same_plan, cpu_threads_per_rank, device, init_distributed,
                          reduce_diagnostics, reduce_metrics, shutdown_distributed)
from .failstop import fail_stop, start_watchdog, stop_watchdog
from .ds_config import batch_layout, fill_ds_config, load_ds_config
from .gather import kept_parameters, skip_aware_gather
from .reference import build_reference, has_saved_reference, save_reference
from .setup import (build_engine, build_inference_engine, load_model_for_engine, loss_scale_for_engine, optimizer_step,
                    set_learning_rate)

__all__ = ["all_reduce_sum", "barrier", "batch_layout", "build_engine", "build_inference_engine", "build_reference", "check_same_plan",
           "consolidated_state_dict", "cpu_threads_per_rank", "device", "export_hf_model", "fail_stop", "fill_ds_config",
           "has_saved_reference", "init_distributed", "kept_parameters", "latest_tag", "load_checkpoint",
           "load_ds_config", "load_model_for_engine", "loss_scale_for_engine", "optimizer_step", "reduce_diagnostics", "reduce_metrics", "save_checkpoint",
           "save_reference", "set_learning_rate", "shutdown_distributed", "skip_aware_gather", "start_watchdog", "stop_watchdog"]
