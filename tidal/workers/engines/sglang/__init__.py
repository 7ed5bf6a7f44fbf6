"""SGLang rollout engine (GPU only); importing this package does not import SGLang."""
