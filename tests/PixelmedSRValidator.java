// Pixelmed's DicomSRValidator (Debian pixelmed-apps, the validator of IHE Connectathons)
// over many SR files in one Java process: the validator compiles its XSLT rules (several MB)
// when it is made, tens of seconds, so tests/sr_validators.py makes it once for all their
// SRs instead of once a file. Each file's report follows a line "=== PATH"; the reports are
// what `DicomSRValidator PATH` prints (its default options).
//
//   java -cp /usr/share/java/pixelmed.jar tests/PixelmedSRValidator.java SR.dcm...
import com.pixelmed.validate.DicomSRValidator;

public class PixelmedSRValidator {
    public static void main(String[] args) throws Exception {
        DicomSRValidator validator = new DicomSRValidator();
        for (String path : args) {
            System.out.println("=== " + path);
            System.out.print(validator.validate(path));
        }
    }
}
