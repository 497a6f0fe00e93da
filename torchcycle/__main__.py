from torchcycle.cli import entry

entry()
