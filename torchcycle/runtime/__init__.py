"""What a logged model ships, and nothing else: bundle loading, the data contract, the pyfunc entry point.

Modules here import only each other, `torchcycle.models` and third-party packages; torchcycle.model_code
follows these imports to decide the model's code and its pip requirements."""
