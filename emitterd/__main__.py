from emitterd.cli.daemon_cmd import main

main()
