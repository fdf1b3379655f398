"""The `tike-trl analyze` application: its command, model loading and sampling, its math and its report."""
