from torchcycle.cli import main

main()
