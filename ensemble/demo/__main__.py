from ensemble.demo.run import main

main()
