"""The training applications: the GRPO job, the `tike-trl train` command, its data and its run log."""

# Where `tike-trl train` saves its model, and where `tike-trl analyze` looks for a trained policy.
# It lives here, in a package init that imports nothing, so that the analysis reads it without
# importing the train command (and its TRL parsing) or the job module.
DEFAULT_OUTPUT_DIR = "outputs/tike-train"
