"""Planted bugs: each must make the tests that guard against it fail (``make mutants``).

A test is only done when it fails on the bug it guards against. Each mutant below is one small,
realistic bug (a wrong mask, a missing normalisation, an lr of 0, swapped terms, ...) planted in a
copy of the repository; the named tests are run on that copy and must fail. A mutant that survives,
or whose code no longer exists (the source moved on: update the mutant), is reported and the script
exits non-zero. The checkout itself is never modified.

    python tests/mutants.py            # all mutants
    python tests/mutants.py mae lr     # those whose name contains "mae" or "lr"
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # file to mutate, relative to the repository root
    edits: tuple[tuple[str, str], ...]  # (exact old text, new text), each must occur exactly once
    tests: tuple[str, ...]  # pytest node ids that must fail


MUTANTS = [
    Mutant(
        "mae-loss-on-every-patch",
        "selfsup/algorithms/mae.py",
        (
            (
                "patchify(x, self.backbone.patch_size), mask)",
                "patchify(x, self.backbone.patch_size), torch.ones_like(mask))",
            ),
        ),
        ("tests/algorithms/test_mae_parts.py::test_forward_loss_is_on_the_masked_patches_only",),
    ),
    Mutant(
        "features-without-normalisation",
        "selfsup/eval/features.py",
        (('out = fn(normalize(batch["views"][0]))', 'out = fn(batch["views"][0].float())'),),
        (
            "tests/eval/test_features.py::test_extract_features_uses_eval_transform_and_normalisation",
            "tests/eval/test_features.py::test_trainer_knn_uses_backbone_features_of_normalised_eval_images",
        ),
    ),
    Mutant(
        "features-in-train-mode",
        "selfsup/eval/knn.py",
        (("        model.eval()\n        try:", "        try:"),),
        ("tests/eval/test_features.py::test_trainer_knn_uses_backbone_features_of_normalised_eval_images",),
    ),
    Mutant(
        "knn-without-l2-normalisation",
        "selfsup/eval/knn.py",
        (
            (
                "queries, bank = F.normalize(queries.float(), dim=1), F.normalize(bank.float(), dim=1)",
                "queries, bank = queries.float(), bank.float()",
            ),
        ),
        ("tests/eval/test_knn.py::test_scores_match_reference",),
    ),
    Mutant(
        "ntxent-under-autocast",
        "selfsup/losses/ntxent.py",
        (("with torch.autocast(device_type=z1.device.type, enabled=False):", "if True:"),),
        ("tests/losses/test_ntxent.py::test_loss_under_bf16_autocast_is_computed_in_fp32",),
    ),
    Mutant(
        "mae-loss-under-autocast",
        "selfsup/losses/mae_reconstruction.py",
        (
            ("with torch.autocast(device_type=pred.device.type, enabled=False):", "if True:"),
            (
                "pred, target, mask = pred.float(), target.float(), mask.float()",
                "target, mask = target.to(pred.dtype), mask.to(pred.dtype)",
            ),
        ),
        ("tests/losses/test_mae_reconstruction.py::test_loss_under_bf16_autocast_is_computed_in_fp32",),
    ),
    Mutant(
        "weighted-ce-without-upcast",  # (autocast alone would run cross entropy in fp32: the upcast is the guard)
        "selfsup/losses/weighted_ce.py",
        (
            ("weight = None if class_weight is None else class_weight.float()", "weight = class_weight"),
            (
                "F.cross_entropy(logits.float(), labels, weight=weight)",
                "F.cross_entropy(logits, labels, weight=weight)",
            ),
        ),
        ("tests/losses/test_weighted_ce.py::test_loss_under_bf16_autocast_is_computed_in_fp32",),
    ),
    Mutant(
        "lr-times-zero",
        "selfsup/engine/trainer.py",
        (("self.lr = scaled_lr(", "self.lr = 0 * scaled_lr("),),
        (
            "tests/algorithms/test_training.py::test_trainer_loss_goes_down[simclr-trained]",
            "tests/algorithms/test_training.py::test_trainer_loss_goes_down[mae-trained]",
        ),
    ),
    Mutant(
        "odc-memory-momentum-swapped",
        "selfsup/algorithms/odc.py",
        (
            (
                "(1 - self.momentum) * self.features[index] + self.momentum * feature",
                "self.momentum * self.features[index] + (1 - self.momentum) * feature",
            ),
        ),
        ("tests/algorithms/test_training.py::test_odc_memory_update_follows_the_formula",),
    ),
    Mutant(
        "ema-weights-swapped",
        "selfsup/models/momentum.py",
        (
            ("torch._foreach_mul_(t_params, m)", "torch._foreach_mul_(t_params, 1.0 - m)"),
            (
                "torch._foreach_add_(t_params, o_params, alpha=1.0 - m)",
                "torch._foreach_add_(t_params, o_params, alpha=m)",
            ),
        ),
        ("tests/algorithms/test_byol.py::test_after_step_applies_the_cosine_ema",),
    ),
    Mutant(
        "momentum-twin-loss-pairs-the-same-view",
        "selfsup/algorithms/base.py",
        (("self.loss_fn(p1, z2) + self.loss_fn(p2, z1)", "self.loss_fn(p1, z1) + self.loss_fn(p2, z2)"),),
        (
            "tests/algorithms/test_byol.py::test_loss_is_the_symmetric_normalised_mse_of_prediction_and_other_views_target",
            "tests/algorithms/test_mocov3.py::"
            "test_loss_is_the_symmetric_contrastive_loss_with_keys_of_the_other_view[resnet]",
        ),
    ),
    Mutant(
        "momentum-twin-momentum-not-scheduled",
        "selfsup/algorithms/base.py",
        (("m = self.momentum(state)", "m = self.momentum.start"),),
        (
            "tests/algorithms/test_byol.py::test_after_step_applies_the_cosine_ema",
            "tests/algorithms/test_mocov3.py::test_after_step_applies_the_cosine_momentum",
        ),
    ),
    Mutant(
        "odc-relabelling-under-autocast",
        "selfsup/algorithms/odc.py",
        (
            (
                "with torch.autocast(device_type=self.features.device.type, enabled=False):\n            index =",
                "if True:\n            index =",
            ),
        ),
        ("tests/algorithms/test_training.py::test_odc_relabelling_under_bf16_autocast_matches_fp32",),
    ),
    Mutant(
        "resume-keeps-the-checkpoints-lr",
        "selfsup/engine/trainer.py",
        (("            group.update(values)\n", "            pass\n"),),
        (
            "tests/engine/test_run_dirs.py::"
            "test_resume_refuses_changed_settings_unless_forced_and_uses_the_lr_it_prints",
        ),
    ),
    Mutant(
        "run-dir-with-a-run-not-refused",
        "selfsup/engine/run_dir.py",
        (("refuse, clean = not continues and not overwrite,", "refuse, clean = False,"),),
        ("tests/engine/test_run_dirs.py::test_a_directory_that_holds_a_run_is_refused",),
    ),
    Mutant(
        "resumed-metrics-not-truncated",
        "selfsup/engine/run_dir.py",
        (("    if dropped:\n        write_text_atomic(", "    if False:\n        write_text_atomic("),),
        ("tests/engine/test_run_dirs.py::test_resume_auto_drops_records_past_the_checkpoint_and_stale_temporaries",),
    ),
    Mutant(
        "mid-epoch-resume-restarts-the-epoch",
        "selfsup/engine/trainer.py",
        (("self.loader(self.state.epoch, done * acc, order)", "self.loader(self.state.epoch, 0, order)"),),
        ("tests/engine/test_run_dirs.py::test_ctrl_c_stops_at_a_step_boundary_and_the_run_resumes_step_exactly",),
    ),
    Mutant(
        "ntxent-local-negatives-only",
        "selfsup/losses/ntxent.py",
        (("            if self.gather_distributed:", "            if False:"),),
        ("tests/test_distributed.py::test_training_two_processes_equals_one_process[simclr]",),
    ),
    Mutant(
        "sync-bn-per-rank-statistics",
        "selfsup/models/sync_batchnorm.py",
        (("total = distributed.all_gather_with_grad(local[None]).sum(0)", "total = local"),),
        (
            "tests/test_distributed.py::test_sync_batchnorm_on_cpu_two_ranks_match_one_process",
            "tests/test_distributed.py::test_training_two_processes_equals_one_process[simclr]",
        ),
    ),
    Mutant(
        "lr-scaled-by-the-per-process-batch",
        "selfsup/engine/trainer.py",
        (("self.global_batch = bs * ws * acc", "self.global_batch = bs * acc"),),
        ("tests/test_distributed.py::test_training_two_processes_equals_one_process[simclr]",),
    ),
    Mutant(
        "rng-restore-forgets-torch",
        "selfsup/engine/checkpoint.py",
        (('    torch.set_rng_state(state["torch"])\n', ""),),
        ("tests/test_distributed.py::test_rng_state_survives_pickle",),
    ),
    Mutant(
        "mae-mask-ratio-unchecked",
        "selfsup/algorithms/mae.py",
        (("if not 0.0 <= mask_ratio < 1.0:", "if False:"),),
        (
            "tests/test_cli.py::test_bad_input_gives_one_line[mae-mask-ratio-1]",
            "tests/test_cli.py::test_bad_input_gives_one_line[mae-mask-ratio-negative]",
        ),
    ),
    Mutant(
        "empty-training-split-unchecked",
        "selfsup/data/datasets.py",
        (("    if n_val >= n:\n", "    if False:\n"),),
        ("tests/test_cli.py::test_bad_input_gives_one_line[empty-train-split]",),
    ),
    # ------------------------------------------------------------------------------ launching (issue 8)
    Mutant(
        "stop-signals-not-handled",
        "selfsup/engine/trainer.py",
        (('for name in ("SIGUSR1", "SIGUSR2", "SIGTERM") if hasattr', "for name in () if hasattr"),),
        (
            "tests/launch/test_local_launch.py::test_sigterm_stops_with_a_checkpoint_and_resume_auto_equals_an_uninterrupted_run",
        ),
    ),
    Mutant(
        "stop-overwrites-the-epoch-checkpoint",
        "selfsup/engine/trainer.py",
        (("else self._save(epoch_end=False)", "else self._save()"),),
        ("tests/launch/test_local_launch.py::test_a_stop_in_the_middle_of_an_epoch_keeps_the_last_epoch_checkpoint",),
    ),
    Mutant(
        "dist-port-ignored",
        "selfsup/distributed.py",
        (('    if port is not None:\n        return port, "dist.port"\n', ""),),
        (
            "tests/launch/test_local_launch.py::test_configured_port_prefers_dist_port_then_port_then_master_port",
            "tests/launch/test_local_launch.py::test_slurm_port_prefers_dist_port_then_port_then_master_port",
        ),
    ),
    Mutant(
        "slurm-local-rank-from-the-global-rank",
        "selfsup/distributed.py",
        (
            (
                'LOCAL_RANK=str(int(os.environ.get("SLURM_LOCALID", "0")))',
                'LOCAL_RANK=str(int(os.environ["SLURM_PROCID"]))',
            ),
        ),
        ("tests/launch/test_local_launch.py::test_slurm_task_is_recognised_and_exports_torch_variables",),
    ),
    Mutant(
        "workers-not-in-the-run-dir",
        "selfsup/launch/torchrun.py",
        (('*kept, f"hydra.run.dir={quote_override(str(run_dir))}"]', "*kept]"),),
        ("tests/launch/test_local_launch.py::test_worker_command_runs_the_same_overrides_in_the_run_dir",),
    ),
    Mutant(
        "a-failing-member-stops-the-sweep",
        "selfsup/train.py",
        (('        if multirun and os.environ.get("SELFSUP_FULL_ERROR") != "1":', "        if False:"),),
        ("tests/launch/test_local_launch.py::test_a_sweep_runs_every_member_and_summarises_the_failed_one",),
    ),
    Mutant(
        "summary-drops-failed-members",
        "selfsup/launch/sweep.py",
        (("        rows.append(row)\n", "        if state not in FAILED:\n            rows.append(row)\n"),),
        ("tests/launch/test_local_launch.py::test_sweep_summary_of_member_dirs",),
    ),
    Mutant(
        "a-failing-slurm-task-waits-for-its-peers",
        "selfsup/train.py",
        ((' and distributed.launcher_of_this_process() != "slurm"', ""),),
        ("tests/launch/test_slurm.py::test_a_failing_task_of_a_two_task_job_ends_the_job",),
    ),
    Mutant(
        "requeued-job-does-not-resume",
        "selfsup/train.py",
        (('        c.resume = "auto"  # a requeued job', "        pass  # a requeued job"),),
        ("tests/launch/test_slurm.py::test_a_signalled_job_checkpoints_requeues_and_resumes_exactly",),
    ),
    Mutant(
        "knn-benchmark-on-the-training-split",
        "selfsup/eval/knn.py",
        (
            (
                "queries, query_labels = ctx.features(ctx.val, (self.stage,))",
                "queries, query_labels = ctx.features(ctx.train, (self.stage,))",
            ),
        ),
        ("tests/test_benchmark.py::test_knn_benchmark_measures_the_checkpoints_features_on_the_held_out_split",),
    ),
    Mutant(
        "stage-features-without-the-final-norm",
        "selfsup/eval/features.py",
        (("            normed = backbone.norm(z)  # type: ignore[operator]", "            normed = z"),),
        ("tests/eval/test_features.py::test_stage_features_end_in_the_backbones_own_feature",),
    ),
    Mutant(
        "mae-vis-skips-denormalisation",
        "selfsup/tools/mae_vis.py",
        (("    if not norm_pix:\n        return pred\n", "    return pred\n"),),
        ("tests/tools/test_mae_vis.py::test_perfect_prediction_with_denorm_original_is_the_original",),
    ),
    Mutant(
        "mae-vis-panels-swapped",
        "selfsup/tools/mae_vis.py",
        (
            (
                "return Panels(hwc(x), hwc(masked), hwc(recon), hwc(pasted))",
                "return Panels(hwc(x), hwc(masked), hwc(pasted), hwc(recon))",
            ),
        ),
        ("tests/tools/test_mae_vis.py::test_masked_and_pasted_panels",),
    ),
    Mutant(
        "export-vit-mlp-layers-swapped",
        "selfsup/tools/export.py",
        (
            (
                '("blocks.{b}.mlp.0.{t}", "blocks.{b}.mlp.fc1.{t}"),',
                '("blocks.{b}.mlp.0.{t}", "blocks.{b}.mlp.fc2.{t}"),',
            ),
            (
                '("blocks.{b}.mlp.2.{t}", "blocks.{b}.mlp.fc2.{t}"),',
                '("blocks.{b}.mlp.2.{t}", "blocks.{b}.mlp.fc1.{t}"),',
            ),
        ),
        ("tests/tools/test_export.py::test_tiny_vit_gives_timms_pooled_feature",),
    ),
    Mutant(
        "tsne-no-per-class-cap",
        "selfsup/tools/tsne.py",
        (
            (
                "groups, cap = [np.flatnonzero(labels == c) for c in classes], per_class",
                "groups, cap = [np.flatnonzero(labels == c) for c in classes], 0",
            ),
        ),
        ("tests/tools/test_tsne.py::test_select_caps_classes_and_images_deterministically",),
    ),
    Mutant(
        "svm-class-weights-swapped",
        "selfsup/eval/svm.py",
        (("class_weight={1: positive_weight, -1: 1.0},", "class_weight={1: 1.0, -1: positive_weight},"),),
        ("tests/eval/test_svm.py::test_matches_an_independent_implementation_of_mmselfsup",),
    ),
    Mutant(
        "svm-without-l2-normalisation",
        "selfsup/eval/svm.py",
        (("    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-5)", "    return x"),),
        ("tests/eval/test_svm.py::test_rows_are_l2_normalised",),
    ),
    # ------------------------------------------------------------------------------ issue 10: the zoo
    Mutant(
        "relative-loc-pair-is-neighbour-then-centre",
        "selfsup/algorithms/relative_loc.py",
        (
            (
                "torch.cat([centre.expand_as(neighbours), neighbours], dim=2)",
                "torch.cat([neighbours, centre.expand_as(neighbours)], dim=2)",
            ),
        ),
        (
            "tests/algorithms/test_relative_loc.py::"
            "test_loss_is_the_cross_entropy_of_the_centre_neighbour_pair_classifier[grid-targets]",
            "tests/algorithms/test_relative_loc.py::"
            "test_targets_follow_the_grid_layout_and_the_pair_is_centre_then_neighbour",
        ),
    ),
    Mutant(
        "relative-loc-labels-image-major",
        "selfsup/algorithms/relative_loc.py",
        (("labels = targets[:, NEIGHBOURS].T.reshape(-1)", "labels = targets[:, NEIGHBOURS].reshape(-1)"),),
        (
            "tests/algorithms/test_relative_loc.py::"
            "test_loss_is_the_cross_entropy_of_the_centre_neighbour_pair_classifier[shuffled-targets]",
            "tests/algorithms/test_relative_loc.py::"
            "test_targets_follow_the_grid_layout_and_the_pair_is_centre_then_neighbour",
        ),
    ),
    Mutant(
        "rotation-pred-labels-image-major",
        "selfsup/algorithms/rotation_pred.py",
        (("labels = targets.T.reshape(-1)", "labels = targets.reshape(-1)"),),
        (
            "tests/algorithms/test_rotation_pred.py::test_loss_is_the_cross_entropy_of_the_rotation_classifier",
            "tests/algorithms/test_rotation_pred.py::test_targets_align_with_the_rotated_images_in_one_backbone_pass",
        ),
    ),
    Mutant(
        "rotation-pred-backbone-detached",
        "selfsup/algorithms/rotation_pred.py",
        (
            (
                "logits = self.head(self.backbone(torch.cat(views)))",
                "logits = self.head(self.backbone(torch.cat(views)).detach())",
            ),
        ),
        ("tests/algorithms/test_rotation_pred.py::test_gradients_reach_backbone_and_head",),
    ),
    Mutant(
        "moco-queue-updated-before-the-loss",
        "selfsup/algorithms/moco.py",
        (
            (
                "        loss = self.loss_fn(q, k, self.queue())\n        self.queue.enqueue(k)",
                "        self.queue.enqueue(k)\n        loss = self.loss_fn(q, k, self.queue())",
            ),
        ),
        (
            "tests/algorithms/test_moco.py::test_loss_uses_the_queue_of_older_keys_then_enqueues_the_new_ones_in_batch_order",
        ),
    ),
    Mutant(
        "moco-momentum-update-every-micro-batch",
        "selfsup/algorithms/moco.py",
        (("            self._key_update_due = False\n", ""),),
        ("tests/algorithms/test_moco.py::test_momentum_update_runs_once_per_step_before_the_keys",),
    ),
    Mutant(
        "infonce-logits-times-temperature",
        "selfsup/losses/infonce.py",
        (
            (
                "torch.cat([positive, negative], dim=1) / self.temperature",
                "torch.cat([positive, negative], dim=1) * self.temperature",
            ),
        ),
        (
            "tests/losses/test_infonce.py::test_shared_negatives_match_the_formula[0-0.07]",
            "tests/losses/test_infonce.py::test_the_positive_is_the_row_paired_key_at_index_zero",
        ),
    ),
    Mutant(
        "split-batchnorm-running-stats-of-the-last-group",
        "selfsup/models/split_batchnorm.py",
        (
            ("self.running_mean.copy_(torch.stack(means).mean(0))", "self.running_mean.copy_(means[-1])"),
            ("self.running_var.copy_(torch.stack(variances).mean(0))", "self.running_var.copy_(variances[-1])"),
        ),
        ("tests/algorithms/test_moco.py::test_split_batchnorm_is_batchnorm_on_each_group",),
    ),
    Mutant(
        "densecl-matched-on-the-projections",
        "selfsup/algorithms/densecl.py",
        (
            (
                "match = dense_correspondence(feature_map.flatten(2), key_features)",
                "match = dense_correspondence(r_q, r_k)",
            ),
        ),
        ("tests/algorithms/test_densecl.py::test_losses_queues_and_correspondence_follow_the_paper",),
    ),
    Mutant(
        "densecl-global-loss-not-weighted",
        "selfsup/algorithms/densecl.py",
        (('"loss": (1 - lam) * loss_global + lam * loss_dense', '"loss": loss_global + lam * loss_dense'),),
        (
            "tests/algorithms/test_densecl.py::test_losses_queues_and_correspondence_follow_the_paper",
            "tests/algorithms/test_densecl.py::test_lambda_is_zero_before_start_iters_and_survives_resume",
        ),
    ),
    Mutant(
        "mocov3-labels-not-offset-by-rank",
        "selfsup/losses/mocov3_contrastive.py",
        (
            (
                "k, offset = distributed.all_gather(k), distributed.get_rank() * n",
                "k, offset = distributed.all_gather(k), 0",
            ),
        ),
        ("tests/losses/test_mocov3_loss.py::test_keys_of_other_ranks_are_negatives_and_labels_are_offset_by_rank",),
    ),
    Mutant(
        "dino-center-updated-with-student-outputs",
        "selfsup/algorithms/dino.py",
        (("self.update_center(teacher)", "self.update_center(torch.cat(student[:g]))"),),
        (
            "tests/algorithms/test_dino.py::"
            "test_loss_is_dino_loss_over_the_crops_and_the_center_follows_the_raw_teacher_outputs[resnet]",
        ),
    ),
    Mutant(
        "dino-teacher-not-centred",
        "selfsup/losses/dino.py",
        (
            (
                "F.softmax((t.detach().float() - c) / teacher_temp, dim=1)",
                "F.softmax(t.detach().float() / teacher_temp, dim=1)",
            ),
        ),
        (
            "tests/losses/test_dino_loss.py::test_matches_the_float64_formula_over_pairs_of_different_crops[0-4-0.04]",
            "tests/losses/test_dino_loss.py::test_center_and_temperatures_matter_and_a_tensor_temperature_works",
        ),
    ),
    Mutant(
        "simsiam-no-stop-gradient",
        "selfsup/losses/simsiam.py",
        (("F.normalize(target.detach().to(dtype)", "F.normalize(target.to(dtype)"),),
        (
            "tests/algorithms/test_simsiam.py::test_stop_gradient_on_the_projections",
            "tests/losses/test_simsiam_loss.py::test_gradient_flows_into_the_prediction_only",
        ),
    ),
    Mutant(
        "simsiam-pairs-the-same-view",
        "selfsup/algorithms/simsiam.py",
        (
            (
                "self.loss_fn(p1, z2) / 2 + self.loss_fn(p2, z1) / 2",
                "self.loss_fn(p1, z1) / 2 + self.loss_fn(p2, z2) / 2",
            ),
        ),
        (
            "tests/algorithms/test_simsiam.py::"
            "test_loss_is_the_symmetric_negative_cosine_of_prediction_and_other_views_projection",
        ),
    ),
    Mutant(
        "barlowtwins-c-not-divided-by-the-batch",
        "selfsup/losses/barlowtwins.py",
        (
            (
                "c = self.standardize(z1).T @ self.standardize(z2) / n",
                "c = self.standardize(z1).T @ self.standardize(z2)",
            ),
        ),
        (
            "tests/losses/test_barlowtwins_loss.py::test_matches_the_loop_reference[0]",
            "tests/algorithms/test_barlowtwins.py::test_loss_is_the_cross_correlation_loss_of_the_two_views_projections",
        ),
    ),
    Mutant(
        "barlowtwins-statistics-of-the-local-batch",
        "selfsup/losses/barlowtwins.py",
        (("            if self.gather_distributed:", "            if False:"),),
        ("tests/losses/test_barlowtwins_loss.py::test_on_rank_1_of_2_statistics_and_c_are_over_the_gathered_batch",),
    ),
    Mutant(
        "swav-sinkhorn-without-the-global-sum",
        "selfsup/algorithms/swav.py",
        (
            (
                "q /= distributed.all_reduce_(q.sum(dim=1, keepdim=True))",
                "q /= q.sum(dim=1, keepdim=True)",
            ),
        ),
        ("tests/algorithms/test_swav.py::test_sinkhorn_on_two_ranks_gives_the_codes_of_the_global_batch",),
    ),
    Mutant(
        "swav-codes-of-the-queue-rows",
        "selfsup/algorithms/swav.py",
        (("self.sinkhorn_iterations)[-z.shape[1] :]", "self.sinkhorn_iterations)[: z.shape[1]]"),),
        ("tests/algorithms/test_swav.py::test_queue_enters_the_codes_once_full",),
    ),
    Mutant(
        "vicreg-covariance-not-centred",
        "selfsup/losses/vicreg.py",
        (("zc = z - z.mean(dim=0)", "zc = z"),),
        (
            "tests/losses/test_vicreg_loss.py::test_matches_the_loop_reference[0]",
            "tests/algorithms/test_vicreg.py::test_loss_and_logged_terms_on_the_two_views_embeddings",
        ),
    ),
    Mutant(
        "vicreg-statistics-of-the-local-batch",
        "selfsup/losses/vicreg.py",
        (("            if self.gather_distributed:", "            if False:"),),
        ("tests/losses/test_vicreg_loss.py::test_on_rank_1_of_2_variance_and_covariance_are_over_the_gathered_batch",),
    ),
    Mutant(
        "deepcluster-pca-without-whitening",
        "selfsup/algorithms/deepcluster.py",
        (("return mean, eigenvectors * scale", "return mean, eigenvectors"),),
        (
            "tests/algorithms/test_deepcluster.py::test_pca_whitening_gives_identity_covariance_along_the_top_principal_axes",
        ),
    ),
    Mutant(
        "deepcluster-head-init-not-seeded",
        "selfsup/algorithms/deepcluster.py",
        ((".normal_(0.0, HEAD_STD, generator=gen)", ".normal_(0.0, HEAD_STD)"),),
        ("tests/algorithms/test_deepcluster.py::test_head_is_reinitialised_each_epoch_but_not_on_a_mid_epoch_resume",),
    ),
    Mutant(
        "deepcluster-sobel-twice-dx",
        "selfsup/algorithms/deepcluster.py",
        (("torch.stack([dx, dy])[:, None]", "torch.stack([dx, dx])[:, None]"),),
        ("tests/algorithms/test_deepcluster.py::test_sobel_input_is_grey_edges_into_a_two_channel_conv1",),
    ),
    Mutant(
        "npid-negatives-drawn-per-rank",
        "selfsup/algorithms/npid.py",
        (
            (
                "neg = memory.sample_negatives(self.num_negatives, b * world)",
                "neg = memory.sample_negatives(self.num_negatives, b).repeat(world, 1)",
            ),
        ),
        ("tests/algorithms/test_npid.py::test_negatives_are_this_ranks_rows_of_one_draw_for_the_global_batch",),
    ),
    Mutant(
        "npid-nce-mean-over-negatives",
        "selfsup/losses/npid.py",
        (("log_not_h_neg.sum(dim=1)", "log_not_h_neg.mean(dim=1)"),),
        ("tests/losses/test_npid_loss.py::test_nce_matches_the_float64_reference[0-per-row-negatives]",),
    ),
    Mutant(
        "npid-nce-noise-without-m",
        "selfsup/losses/npid.py",
        (("math.log(neg.shape[1] / self.num_samples)", "math.log(1 / self.num_samples)"),),
        ("tests/losses/test_npid_loss.py::test_nce_matches_the_float64_reference[0-per-row-negatives]",),
    ),
    Mutant(
        "batched-rotation-the-wrong-way",
        "selfsup/data/batched.py",
        (
            (
                "m = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)",
                "m = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)",
            ),
        ),
        ("tests/data/test_batched.py::test_rotation_shift_and_flip_match_torchvision",),
    ),
    Mutant(
        "batched-jitter-in-a-fixed-order",
        "selfsup/data/batched.py",
        (
            (
                "chosen = p.jitter & (p.order[:, position] == op)",
                "chosen = p.jitter & (position == op)",
            ),
        ),
        ("tests/data/test_batched.py::test_jitter_applies_each_images_own_order_like_torchvision",),
    ),
    Mutant(
        "batched-crop-area-from-zero",
        "selfsup/data/batched.py",
        (("area = h_img * w_img * (s0 + (s1 - s0) * u_crop[:, :10])", "area = h_img * w_img * (s1 * u_crop[:, :10])"),),
        ("tests/data/test_batched.py::test_crop_boxes_follow_random_resized_crop",),
    ),
    Mutant(
        "batched-copies-share-a-stream",
        "selfsup/data/batched.py",
        (("base = splitmix64(seeds + offset)", "base = splitmix64(seeds + 0 * offset)"),),
        (
            "tests/data/test_batched.py::test_splitmix64_and_uniforms_match_a_python_reference",
            "tests/data/test_batched.py::test_a_view_depends_only_on_its_image_and_seed",
        ),
    ),
    Mutant(
        "worker-crops-ignore-the-image-seed",
        "selfsup/data/loader.py",
        (('"crops": self.executor.crops(image, seed)', '"crops": self.executor.crops(image, 0)'),),
        ("tests/data/test_data_path.py::test_every_cache_mode_and_worker_count_gives_the_same_views",),
    ),
    Mutant(
        "compile-mode-ignored",
        "selfsup/engine/trainer.py",
        (("if c.compile:\n", "if False:\n"),),
        ("tests/engine/test_compile.py::test_a_compiled_run_trains_like_the_eager_one[cpu-reduce-overhead-0.0001]",),
    ),
    Mutant(
        "views-time-not-summed",
        "selfsup/engine/trainer.py",
        (("self.aug_seconds += self._aug_time", "self.aug_seconds = self._aug_time"),),
        ("tests/test_cli.py::test_a_run_prints_where_its_outputs_are",),
    ),
]


def _copy_repo(dst: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src = REPO / name.decode()
        target = dst / name.decode()
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():  # e.g. selfsup/conf -> ../conf
            os.symlink(os.readlink(src), target)
        elif src.is_file():
            shutil.copy2(src, target)


def _pytest(copy: Path, tests: list[str] | tuple[str, ...]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(copy), "CUDA_VISIBLE_DEVICES": "-1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *tests]
    return subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=1800)


def run(mutant: Mutant, copy: Path) -> tuple[str, float]:
    """'caught', 'SURVIVED' or 'STALE' (the code to mutate is not there), and the seconds it took."""
    path = copy / mutant.path
    original = path.read_text()
    text = original
    for old, new in mutant.edits:
        if text.count(old) != 1:
            return "STALE", 0.0
        text = text.replace(old, new)
    path.write_text(text)
    t0 = time.perf_counter()
    try:
        proc = _pytest(copy, mutant.tests)
    finally:
        path.write_text(original)
    # every named test must fail: exit status 1 and no "passed" in pytest's summary line (exit status 2 =
    # interrupted, 4 = usage error, 5 = nothing collected are not catches)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    caught = proc.returncode == 1 and "passed" not in summary and "error" not in summary
    return ("caught" if caught else "SURVIVED"), time.perf_counter() - t0


def main(patterns: list[str]) -> int:
    chosen = [m for m in MUTANTS if not patterns or any(p in m.name for p in patterns)]
    bad = 0
    with tempfile.TemporaryDirectory(prefix="selfsup-mutants-") as tmp:
        copy = Path(tmp)
        _copy_repo(copy)
        # the baseline: every guarding test passes on the unmutated copy (else a "catch" means nothing)
        tests = sorted({t for m in chosen for t in m.tests})
        baseline = _pytest(copy, tests)
        if baseline.returncode != 0:
            print(baseline.stdout[-3000:] + baseline.stderr[-2000:])
            print("the guarding tests fail without any planted bug: fix them first")
            return 1
        print(f"baseline: the {len(tests)} guarding tests pass on the unmutated copy", flush=True)
        for mutant in chosen:
            verdict, seconds = run(mutant, copy)
            bad += verdict != "caught"
            print(f"{verdict:8s} {mutant.name:40s} {seconds:6.1f} s  ({', '.join(mutant.tests)})", flush=True)
    print(f"{len(chosen) - bad}/{len(chosen)} planted bugs caught")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
