from confide.cli.main import main

main()
