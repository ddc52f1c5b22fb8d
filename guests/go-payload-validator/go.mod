module example.com/go-payload-validator

go 1.24
