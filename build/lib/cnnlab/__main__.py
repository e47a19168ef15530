from cnnlab.cli.commands import main

main()
