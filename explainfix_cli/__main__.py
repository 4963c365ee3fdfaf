from explainfix_cli.cli import main

main()
