"""Moving weights from a training layout to a generation layout (see DESIGN.md, "Parallel layouts")."""
