"""All DeepSpeed and torch.distributed code of the package lives here."""
from .internals import check_versions  # noqa: F401  (first: checks the pinned versions at import)
from .checkpoint import (NO_SPACE, committed_tags, consolidated_state_dict, disk_full, export_hf_model, latest_tag, load_checkpoint,
                         load_first_loadable, make_current, no_space_error, remove_uncommitted, resume_candidates,
                         save_checkpoint, tag_order)
from .distributed import (all_gather_object, all_reduce_sum, barrier, broadcast_object, check_same_plan,
                          cpu_threads_per_rank, device, init_distributed, reduce_diagnostics, reduce_metrics,
                          shutdown_distributed)
from .failstop import fail_stop, start_watchdog, stop_watchdog
from .ds_config import batch_layout, fill_ds_config, load_ds_config
from .gather import kept_parameters, skip_aware_gather
from .reference import build_reference, has_saved_reference, save_reference
from .setup import (build_engine, build_inference_engine, last_grad_norm, load_model_for_engine, loss_scale_for_engine,
                    optimizer_step, parameters_finite, set_learning_rate)

__all__ = ["NO_SPACE", "all_gather_object", "all_reduce_sum", "barrier", "broadcast_object", "batch_layout", "build_engine", "build_inference_engine", "build_reference", "check_same_plan", "committed_tags",
           "consolidated_state_dict", "cpu_threads_per_rank", "device", "disk_full", "export_hf_model", "fail_stop", "fill_ds_config",
           "has_saved_reference", "init_distributed", "kept_parameters", "last_grad_norm", "latest_tag", "load_checkpoint", "load_first_loadable",
           "load_ds_config", "load_model_for_engine", "loss_scale_for_engine", "make_current", "no_space_error", "optimizer_step", "parameters_finite", "reduce_diagnostics", "reduce_metrics", "remove_uncommitted", "resume_candidates", "save_checkpoint",
           "save_reference", "set_learning_rate", "shutdown_distributed", "skip_aware_gather", "start_watchdog", "stop_watchdog", "tag_order"]
